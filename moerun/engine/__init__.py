"""The engine: requests, the per-replica scheduler, the stage worker and the pipeline
schedule that ties them together (see engine.py); messages.py holds the leader's tick."""
from ..options import EngineConfig
from .engine import Engine, follow_leader
from .request import Request, SeqStep, TokenEvent

__all__ = ["Engine", "EngineConfig", "Request", "SeqStep", "TokenEvent", "follow_leader"]
