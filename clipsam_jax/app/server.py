"""Starting and stopping the web app: its temporary work folder (uploads, requests, the demo's
models), the Analyzer, the page, and Gradio's server on it.

Nothing is written outside the work folder: Gradio's upload folder is pointed inside it
(GRADIO_TEMP_DIR, set before Gradio is imported), so is the CLIP cache unless --cache-dir names
one, and `App.close` deletes it all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipsam_jax.app.analyzer import Analyzer, AppConfig
from clipsam_jax.config import DEFAULT_RUNTIME, RuntimeConfig


@dataclass
class App:
    """A running app: its `url`, work folder, analyzer, Gradio page and the examples it shows
    [(image path, class name)]."""

    url: str
    work: Path
    analyzer: Analyzer
    page: object
    examples: list[tuple[str, str]]
    _previous_temp: str | None

    def close(self) -> None:
        """Stop the server and delete the work folder."""
        self.page.close()
        shutil.rmtree(self.work, ignore_errors=True)
        _restore_temp(self._previous_temp)


def start(config: AppConfig, runtime: RuntimeConfig = DEFAULT_RUNTIME, *, demo: bool = False,
          block: bool = False, quiet: bool = False) -> App:  # fmt: skip
    """Load the models and serve the page on `config.host:config.port` (port 0: a free one).
    `block`: serve until interrupted (then clean up and return); otherwise return at once."""
    work = Path(tempfile.mkdtemp(prefix="clipsam-app-"))
    if runtime.cache_dir is None:  # CLIP's converted weights and text features: in `work` too
        runtime = dataclasses.replace(runtime, cache_dir=str(work / "cache"))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(work / "uploads")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        from clipsam_jax.app import demo as demo_lib
        from clipsam_jax.app.page import build_page  # imports Gradio: after GRADIO_TEMP_DIR

        examples, note = [], ""
        if demo:
            config, examples = demo_lib.prepare(config, work)
            note = demo_lib.DEMO_NOTE
        analyzer = Analyzer(config, work, runtime)
        page = build_page(analyzer, examples, note)
        page.queue(default_concurrency_limit=1)  # requests wait their turn: one model
        page.launch(
            server_name=config.host, server_port=config.port or _free_port(config.host),
            prevent_thread_lock=not block, quiet=quiet, allowed_paths=[str(work)],
            max_file_size=f"{config.max_upload_mb}mb", show_error=True,
        )  # fmt: skip
        app = App(page.local_url, work, analyzer, page, examples, previous)
    except BaseException:
        _restore_temp(previous)
        shutil.rmtree(work, ignore_errors=True)
        raise
    if block:  # launch returned: the server stopped (Ctrl-C)
        app.close()
    return app


def _restore_temp(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = previous


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
