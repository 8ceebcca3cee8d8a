"""`farm worker`'s supervisor restarts a process that dies: each slot backs off on its own (a crash
loop on one GPU never delays another), and a process that ran fine for a while restarts at once."""

from __future__ import annotations

import threading

import pytest

from farm import supervisor
from farm.supervisor import Slot


@pytest.fixture
def fake_world(monkeypatch):
    """Fake worker processes and a fake clock that the supervisor's waits advance."""
    world = {"clock": 0.0, "starts": [], "lifetimes": {}, "until": 200.0}

    class Process:
        pid = 4242

        def __init__(self, cmd, env):
            self.name = cmd[cmd.index("--name") + 1]
            self.born = world["clock"]
            world["starts"].append((self.name, self.born))

        def poll(self):
            life = world["lifetimes"][self.name]
            return 1 if life is not None and world["clock"] - self.born >= life else None

        def send_signal(self, _signum):
            pass

        def wait(self, timeout=None):
            return 0

    class Event(threading.Event):
        def wait(self, timeout=None):
            world["clock"] += timeout or 0
            if world["clock"] >= world["until"]:
                self.set()
            return self.is_set()

    monkeypatch.setattr(supervisor.subprocess, "Popen", Process)
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: world["clock"])
    monkeypatch.setattr(supervisor.threading, "Event", Event)
    monkeypatch.setattr(supervisor.signal, "signal", lambda *args: None)
    return world


def _starts(world, name):
    return [t for n, t in world["starts"] if n == name]


def test_a_crash_loop_backs_off_alone(fake_world, farm_settings) -> None:
    settings = farm_settings.model_copy(update={"worker_metrics_port": None})
    fake_world["lifetimes"] = {"bad@h": 0.0, "good@h": None}
    slots = [Slot("bad@h", "cpu", ""), Slot("good@h", "cpu", "")]
    supervisor.run(settings, model=settings.default_model, slots=slots, sweep=False)

    assert _starts(fake_world, "good@h") == [0.0]  # never restarted, never held up
    bad = _starts(fake_world, "bad@h")
    gaps = [b - a for a, b in zip(bad, bad[1:])]
    assert len(bad) >= 6
    assert all(later >= min(2 * earlier - 1, 60) for earlier, later in zip(gaps, gaps[1:])), gaps  # 1, 2, 4 … 60 s
    assert max(gaps) <= 61
    assert slots[0].restarts_total == len(bad) - 1 and slots[1].restarts_total == 0  # farm_worker_restarts_total


def test_a_process_that_ran_fine_restarts_at_once(fake_world, farm_settings) -> None:
    settings = farm_settings.model_copy(update={"worker_metrics_port": None})
    fake_world["until"] = 2000.0
    fake_world["lifetimes"] = {"steady@h": supervisor.STABLE_SECONDS + 100}
    supervisor.run(settings, model=settings.default_model, slots=[Slot("steady@h", "cpu", "")], sweep=False)
    starts = _starts(fake_world, "steady@h")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) >= 4 and all(gap <= supervisor.STABLE_SECONDS + 102 for gap in gaps), gaps


def test_a_worker_renews_its_advert_while_it_lives_and_stops_at_close(farm_settings, monkeypatch) -> None:
    """A killed worker's advert lapses within FARM_ADVERT_TTL because only a live process renews it."""
    import threading

    from workers.context import WorkerContext

    renewed = threading.Event()
    calls: list[float] = []
    ctx = WorkerContext(settings=farm_settings.model_copy(update={"advert_ttl": 5}), model_name="tiny", device="cpu")
    monkeypatch.setattr(ctx, "advertise", lambda: (calls.append(1), renewed.set()))
    ctx._keep_advertising()
    ctx._keep_advertising()  # one keeper per process
    assert renewed.wait(10), "the advert was not renewed within advert_ttl"
    ctx.close()
    ctx._advert_keeper.join(5)
    assert not ctx._advert_keeper.is_alive()
