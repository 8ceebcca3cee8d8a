"""One worker process: one model, one device. Started by ``farm worker`` (``farm.supervisor``).

    python -m workers.main --model tiny --device cuda --name gpu0@host

The launcher sets ``CUDA_VISIBLE_DEVICES`` in this process's environment before it starts, so the
process sees exactly one GPU as ``cuda``. Torch and diffusers are imported here, in the pool's
parent, before the fork, but CUDA is first touched in the pool process (``worker_process_init``),
never before the fork.
"""

from __future__ import annotations

import argparse
import logging
import os

from celery.signals import worker_process_init, worker_process_shutdown

from farm.dispatch.celery_app import make_celery
from farm.dispatch.routing import own_queue, routes
from farm.settings import Settings
from workers.consumption import install as install_poison_guard
from workers.context import WorkerContext
from workers.tasks import register
from workers.training.task import register as register_training


#: At a warm shutdown, seconds a pool process waits for its pending uploads (then their leases run
#: out and the images are rendered again elsewhere).
SHUTDOWN_UPLOAD_SECONDS = 120


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.main")
    parser.add_argument("--model", required=True, help="a name from FARM_MODELS")
    parser.add_argument("--device", default="cuda", help="'cuda' (the one GPU this process sees) or 'cpu'")
    parser.add_argument("--name", required=True, help="Celery node name, e.g. gpu0@host")
    parser.add_argument("--loglevel", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings()
    # torch.compile's kernels and graphs cached on disk: a restarted worker warms up in seconds
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.data_dir / "cache" / "inductor"))
    logging.basicConfig(level=args.loglevel, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    context = WorkerContext(settings=settings, model_name=args.model, device=args.device, node=args.name)
    app = make_celery(settings)
    register(app, context)
    register_training(app, context)  # farm.train_lora: LoRA training jobs (workers.training)
    # a message that cannot be decoded or validated is kept aside as a dead letter and acked, never a
    # consumer crash or a restart loop (workers.consumption; `farm dead-letters`)
    install_poison_guard(app, settings)

    import workers.diffusion.render  # noqa: F401  - torch + diffusers imported once, before the pool forks
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # progress bars inside a worker end up in its log as WARNING lines; Flower shows progress instead
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    @worker_process_init.connect(weak=False)
    def _load_model(**_kwargs) -> None:
        context.after_fork()

    @worker_process_shutdown.connect(weak=False)
    def _finish_uploads(**_kwargs) -> None:
        # a warm shutdown lets the images already rendered reach storage and the database
        context.close(timeout=SHUTDOWN_UPLOAD_SECONDS)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # its live gauges leave with it
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    queues = [settings.queue_for(args.model)]
    if routes(settings):  # a queue of its own, for LoRA jobs routed to it while it is warm
        queues.append(own_queue(settings, args.model, args.name))
    options = [
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--queues={','.join(queues)}",
        f"--hostname={args.name}",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if app.conf.worker_send_task_events:
        options.append("--task-events")
    app.worker_main(options)


if __name__ == "__main__":
    main()
