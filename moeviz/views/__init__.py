"""RoutingTraces and metrics drawn: Plotly figures and HTML. Torch-free; never loads a model."""
