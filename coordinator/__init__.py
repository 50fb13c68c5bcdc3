"""LayerLink coordinator: the upper layer. Discovers nodes, measures, plans, loads stages,
drives the pipeline and serves the OpenAI-compatible API and dashboard."""
