"""The registered method names, without their (torch) implementations: a spec is checked against
them before anything heavy is imported. `_registry.METHODS` holds exactly these, in this order."""

METHOD_NAMES: tuple[str, ...] = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "model_stock", "topk",
)
