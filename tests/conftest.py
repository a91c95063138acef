"""Shared pytest setup: put this directory on ``sys.path`` so tests can ``from helpers import ...``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
