"""Flow 1: safetensors shards in -> NF4 blocks out. :mod:`.selection` decides which tensors (transformers' own rule),
:mod:`.pipeline` streams and writes them, :mod:`.verify` checks a converted folder."""
