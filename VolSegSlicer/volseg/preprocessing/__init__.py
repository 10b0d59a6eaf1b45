"""The way in: a model card's preprocessing steps and volseg's own transforms."""
