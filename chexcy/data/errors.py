"""The error an unusable image file raises, shared by every image reader (JPEG/PNG and DICOM)."""


class ImageReadError(ValueError):
    """An image file that cannot be used: `path` and a short `reason` (what `skipped.csv` records)."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
