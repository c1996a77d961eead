"""Static files: hashed and compressed after collectstatic, plain before it."""

from django.core.files.storage import FileSystemStorage
from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    """Whitenoise's manifest storage, which a fresh clone can serve before collectstatic.

    Without a manifest the hashed names cannot be known; rather than a 500 on
    every page, plain names are used (whitenoise serves them from the apps'
    static folders). Deployments run collectstatic and get hashed, cached files.
    """

    def url(self, name, force=False):
        if not self.hashed_files and not force:
            return FileSystemStorage.url(self, name)
        return super().url(name, force)
