from .db import InstanceRow, StaleTransition, Store

__all__ = ["InstanceRow", "StaleTransition", "Store"]
