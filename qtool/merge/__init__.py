"""Flow 4: adapters -> merged 16-bit checkpoint. :mod:`.math` holds the arithmetic (pure functions), :mod:`.base`
reads the base and matches the adapter to it, :mod:`.pipeline` streams the merge, :mod:`.verify` checks its logits."""
