"""Build script. The compiled CPU/CUDA modules (csrc/) are added here by a later milestone."""
from setuptools import setup

setup()
