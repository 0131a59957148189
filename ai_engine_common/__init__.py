"""What the server (`engine`) and the converter (`convert`) share, so that neither imports the other.

errors.py (the base class of both packages' errors), files.py (file digests), gguf_header.py (the
fast GGUF header reader), machine.py (cores, CPU, RAM: /proc/cpuinfo is parsed here only) and
patient_prompt.py (the simulator's prompt layout, which fine-tuning data follows). This package
imports neither `engine` nor `convert` (tests/test_import_graph.py).
"""
