"""MONAI bundles as volseg models: a bundle folder or zip, read as hostile input
(:mod:`~volseg.bundles.source`), its config resolved without running code
(:mod:`~volseg.bundles.config`), translated into a model card (:mod:`~volseg.bundles.translate`);
:mod:`~volseg.bundles.metadata` reads what ``volseg models`` shows, without torch."""

from volseg.bundles.source import BundleError, is_bundle_dir, open_bundle

__all__ = ["BundleError", "is_bundle_dir", "open_bundle"]
