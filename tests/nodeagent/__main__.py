"""``python -m nodeagent --config agent.json``: run the agent until SIGTERM/SIGINT (or until its parent dies)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import urllib3

from .agent import Agent
from .config import AgentConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="AgentConfig as JSON")
    parser.add_argument("--ready-file", type=Path, help="written (JSON) once the nodes are registered")
    args = parser.parse_args(argv)
    # A kubeconfig with insecure-skip-tls-verify (hand-made dev clusters) would warn on every request.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s", stream=sys.stderr
    )
    agent = Agent(AgentConfig.from_json(args.config.read_text()))
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(agent.ready_info()))
            tmp.replace(args.ready_file)
        while not done.wait(0.5) and not agent.stopping.is_set():
            pass
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
