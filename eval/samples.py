"""The sample documents (samples/) and their questions: the default workload of the benchmarks."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
# One question per fact; tests/sample_questions.md has their answers and sources.
SAMPLE_QUESTIONS = (
    "How tall is the Greywater Point lighthouse?",
    "When was the Greywater Point station automated?",
    "Who was the first principal keeper of Greywater Point?",
    "What is the light characteristic of Skerra Rock Lighthouse?",
    "What is the highest wind gust ever recorded in the Saltmere Islands?",
    "Who founded the Saltmere Coastal Weather Service, and in what year?",
    "How long does the ferry crossing from Kellhaven to Port Ellery take?",
    "What are the museum's opening hours in the summer season?",
)
