"""Which models a worker serves, and its bounded cache of the loaded ones.

A model is a run directory under the models directory (default checkpoints/) that holds a complete
checkpoint; its id is the directory's name and it serves the newest step. An id names a direct
child only: anything with a path separator, or starting with a dot, is no model, so a request can
never reach a file outside the models directory.

Each gevent worker has its own registry, built after gunicorn forks it, so the master never loads
torch or a model. Loaded models are cached by (id, real path, size, mtime) of the checkpoint: a new
step saved into a run is loaded afresh on the next request, while requests already running finish
on the old weights. Loading happens in the model's engine thread (web/scheduler.py), so the worker
keeps answering meanwhile; every request for a model that is loading waits for that one load.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import checkpoint_kind, latest_checkpoint, load_checkpoint, model_from_checkpoint
from model import int8_linear
from model.gpt import GPT
from web.metrics import ServerMetrics
from web.scheduler import Overloaded, Scheduler

log = logging.getLogger("gunicorn.error")  # under gunicorn: its error log


@dataclass(frozen=True)
class ModelInfo:
    """A servable model: what /v1/models lists."""

    id: str
    checkpoint: Path
    created: int  # Unix seconds: when its newest checkpoint was written

    def key(self) -> tuple:
        stat = self.checkpoint.stat()
        return (self.id, str(self.checkpoint.resolve()), stat.st_size, stat.st_mtime_ns)


def default_device(gpu_slot: int) -> str:
    """Where a worker serves when NANOGPT_DEVICE is unset: GPU gpu_slot (modulo the GPUs there are),
    so that one worker per GPU spreads over all of them (gunicorn_config.py numbers the workers);
    the CPU without a GPU."""
    return f"cuda:{gpu_slot % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def load_for_serving(path: Path, device: str | None, gpu_slot: int = 0, quant: str = "none") -> GPT:
    """The model of a checkpoint, ready for inference on device (default: default_device(gpu_slot)).

    Runs in the engine thread: CUDA is initialised there, never in gunicorn's master. On CPU the
    weights are also packed for oneDNN (GPT.pack_for_cpu_inference): twice the memory, 3-4x the
    speed; or, with quant "int8", replaced by int8 ones (GPT.prepare_inference).
    """
    device = device or default_device(gpu_slot)
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = model_from_checkpoint(load_checkpoint(path))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.prepare_inference(quant)
    return model


class ModelRegistry:
    """The models of one models directory, and the schedulers of those loaded in this worker."""

    def __init__(
        self,
        models_dir: str | Path,
        max_models: int = 2,
        max_rows: int = 16,
        max_waiting: int = 64,
        torch_threads: int | None = None,
        device: str | None = None,
        gpu_slot: int = 0,
        metrics: ServerMetrics | None = None,
        quant: str = "none",
    ):
        self.models_dir = Path(models_dir)
        self.max_models = max_models
        self.scheduler_args = {"max_rows": max_rows, "max_waiting": max_waiting, "torch_threads": torch_threads}
        self.device, self.gpu_slot, self.quant = device, gpu_slot, quant
        self.metrics = metrics
        self.loaded: OrderedDict[tuple, Scheduler] = OrderedDict()  # least recently used first
        self._kinds: dict[tuple, str | None] = {}  # checkpoint key -> the stage that wrote it

    def list(self) -> list[ModelInfo]:
        """Every run directory with a complete checkpoint, by name."""
        if not self.models_dir.is_dir():
            return []
        found = (self.find(p.name) for p in sorted(self.models_dir.iterdir()))
        return [info for info in found if info is not None]

    def find(self, model_id: str) -> ModelInfo | None:
        """The model called model_id, or None (also for any id that is not a plain directory name)."""
        if not model_id or model_id.startswith(".") or "/" in model_id or "\\" in model_id or "\0" in model_id:
            return None
        run_dir = self.models_dir / model_id
        if not run_dir.is_dir():
            return None
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            return None
        return ModelInfo(model_id, checkpoint, int(checkpoint.stat().st_mtime))

    def kind(self, info: ModelInfo) -> str | None:
        """The stage that wrote the model's checkpoint: "pretrain" (a base model), "sft" (instruction-tuned), "dpo" (preference-tuned) or None."""
        key = info.key()
        if key not in self._kinds:
            self._kinds[key] = checkpoint_kind(info.checkpoint)
        return self._kinds[key]

    def describe(self) -> str:
        """Where the models come from and which there are, for the server's log at start."""
        where = self.models_dir.resolve()
        if not self.models_dir.is_dir():
            return f"models directory {where} (NANOGPT_MODELS_DIR) does not exist: no models to serve"
        found = ", ".join(f"{m.id} ({self.kind(m) or 'unknown stage'})" for m in self.list())
        weights = f"; int8 weights (NANOGPT_QUANT), {int8_linear.kernel_description()}" if self.quant == "int8" else ""
        return f"models directory {where} (NANOGPT_MODELS_DIR): {found or 'no run directory with a checkpoint'}{weights}"

    def scheduler(self, info: ModelInfo) -> Scheduler:
        """The scheduler of a model, loading it (in the background) if this worker has not yet.

        Raises Overloaded when max_models models are loaded and all of them are busy."""
        key = info.key()
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        # an older checkpoint of this model goes as soon as it is idle; then the least recently used
        for old in [k for k in self.loaded if k[0] == info.id and not self.loaded[k].busy()]:
            self.loaded.pop(old).close()
        for old in list(self.loaded):
            if len(self.loaded) < self.max_models:
                break
            if not self.loaded[old].busy():
                self.loaded.pop(old).close()
        if len(self.loaded) >= self.max_models:
            raise Overloaded(f"{len(self.loaded)} models are loaded and busy (NANOGPT_MAX_MODELS={self.max_models})")
        scheduler = Scheduler(lambda: load_for_serving(info.checkpoint, self.device, self.gpu_slot, self.quant),
                              **self.scheduler_args, metrics=self.metrics, name=info.id)
        log.info("loading model %s from %s", info.id, info.checkpoint)
        self.loaded[key] = scheduler
        return scheduler

    def states(self) -> dict[str, str]:
        """Each loaded model's state (Scheduler.state), newest checkpoint per id."""
        return {model_id: s.state for (model_id, _, _, _), s in self.loaded.items()}
