"""The engine: requests, the per-replica scheduler, the stage worker and the pipeline
schedule that ties them together (see engine.py)."""
from .engine import Engine, EngineConfig, serve_worker
from .request import Request, SeqStep

__all__ = ["Engine", "EngineConfig", "Request", "SeqStep", "serve_worker"]
