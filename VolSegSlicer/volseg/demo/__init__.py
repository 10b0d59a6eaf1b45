"""``volseg demo``: the whole path on bundled data, and its picture."""
