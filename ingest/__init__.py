"""Document loading, sentence splitting, chunking and the ingestion job."""
