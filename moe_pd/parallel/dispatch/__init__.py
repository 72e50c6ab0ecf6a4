"""Token dispatchers: one contract (base.Dispatcher), several backends."""

from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.dispatch.local import LocalDispatcher

__all__ = ["DispatchResult", "Dispatcher", "LocalDispatcher"]
