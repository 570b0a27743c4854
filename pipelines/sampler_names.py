"""The sampler names (numpy- and torch-free): the config checks `data.sampler` against them without
importing pipelines/samplers.py, which builds the samplers with torch."""

SAMPLERS = ("instance", "class_aware", "sqrt", "progressive")
