"""nautilus_pipeline: an asyncio pipeline for market-data ticks."""
