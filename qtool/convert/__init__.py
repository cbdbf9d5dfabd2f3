"""Flow 1: safetensors shards in -> NF4 blocks out. :mod:`.arguments` checks flags and paths before anything loads,
:mod:`.selection` decides which tensors (transformers' own rule), :mod:`.pipeline` streams and writes them with
:mod:`.readahead` reading ahead, :mod:`.verify` checks a converted folder."""
