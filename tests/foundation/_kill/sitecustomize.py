"""Loaded at interpreter start-up by the resume tests' subprocesses (this folder is put first
on PYTHONPATH): makes a real `train_net.py` run SIGKILL its whole process group

* ``KILL_AFTER_ITER=k``: right after iteration k (after all hooks, i.e. after a checkpoint
  written at k), or
* ``KILL_DURING_SAVE=name``: in the middle of writing the checkpoint file ``name.pth``
  (half of its bytes written and flushed).

No exception, no cleanup: what a pre-emption or the OOM killer does.
"""
import os
import signal

_AFTER = os.environ.get("KILL_AFTER_ITER")
_DURING = os.environ.get("KILL_DURING_SAVE")


def _die():
    os.killpg(os.getpgid(0), signal.SIGKILL)


if _AFTER is not None or _DURING is not None:
    import io

    import torch
    from detectron2.engine.train_loop import HookBase

    from projects.engine.trainer import Trainer

    class _KillAfter(HookBase):
        def after_step(self):
            if self.trainer.iter == int(_AFTER):
                _die()

    if _AFTER is not None:
        _build_hooks = Trainer.build_hooks

        def build_hooks(self):
            return _build_hooks(self) + [_KillAfter()]

        Trainer.build_hooks = build_hooks

    if _DURING is not None:
        _save = torch.save

        def save(obj, f, *args, **kwargs):
            name = getattr(f, "name", f if isinstance(f, str) else "")
            if isinstance(name, str) and f"{_DURING}.pth" in os.path.basename(name):
                buf = io.BytesIO()
                _save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()
            return _save(obj, f, *args, **kwargs)

        torch.save = save
