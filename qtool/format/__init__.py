"""On-disk contracts: validated safetensors I/O, the bitsandbytes NF4 key layout, PEFT adapter files, atomic outputs,
checkpoint folders (shards, index, the other files to copy). Each file format has exactly one reader/writer here."""
