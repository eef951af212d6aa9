"""Coverage-guided fuzzing of every decoder that takes bytes from outside.

``fuzz.targets`` holds one harness per decoder (serial frames, the MQTT
codec, the wire messages, ingest's batch and state preparation); each feeds
arbitrary bytes in and lets only the declared errors (``InputError`` and its
subclasses) pass, checking cheap invariants on what decodes. ``fuzz.seeds``
writes the seed corpus from the real encoders; ``python -m fuzz`` runs a
target, or all of them, under atheris (libFuzzer). See ``fuzz/README.md``.
"""
