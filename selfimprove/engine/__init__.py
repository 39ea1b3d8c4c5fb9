"""The engine: stages, fingerprints, done-markers, the shared store, tracking and reports. It knows
nothing about models: importing it (or any module in it) imports no torch, transformers, TRL, vLLM
or datasets (tests/test_engine_imports.py), so `--help`, `status` and `report` stay instant."""
