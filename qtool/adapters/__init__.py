"""Parameter-efficient adapters on a frozen NF4 base: the frozen product and each method apart from it."""
