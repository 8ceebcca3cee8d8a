"""The embedded broker: kombu's filesystem transport, made safe for several processes.

kombu's stock filesystem transport writes a message file in place (a consumer can pick up a
half-written file) and, unless ``store_processed`` is on, claims a message by ``shutil.move`` into
the system temp folder, which is a copy, not an atomic rename, when that folder is on another
filesystem: two workers can then both take the same message. This subclass writes each message
under a temporary name and renames it into the queue, and claims it by renaming it into a
``claimed`` folder beside the queue (same filesystem, so exactly one consumer wins) before reading
and deleting it. Library gap noted in the README: kombu should do this itself.

Registered as the ``farmfs://`` transport by :mod:`farm.dispatch.celery_app`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000)):015d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temp = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(temp, "wb") as handle:
            handle.write(str_to_bytes(dumps(payload)))
        os.replace(temp, final)

    def _get(self, queue):
        wanted = f"{queue}.msg"
        claimed = Path(self.data_folder_in).parent / "claimed"
        claimed.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:  # the stock transport's own test; temp files fail it
                continue
            mine = claimed / f"{os.getpid()}-{name}"
            try:
                os.rename(os.path.join(self.data_folder_in, name), mine)
            except OSError:  # another consumer took it first
                continue
            try:
                payload = mine.read_bytes()
            finally:
                mine.unlink(missing_ok=True)
            return loads(bytes_to_str(payload))
        raise filesystem.Empty()


class Transport(filesystem.Transport):
    Channel = Channel
