"""The on-device agent ships as the single file ``edgeops_agent.py`` beside this module."""

from pathlib import Path

AGENT_FILE = Path(__file__).resolve().parent / "edgeops_agent.py"
