"""Static files: hashed and compressed after collectstatic, plain before it."""

from django.core.files.storage import FileSystemStorage
from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    """Whitenoise's manifest storage, which a fresh clone can serve before collectstatic.

    Without a manifest the hashed names cannot be known; rather than a 500 on
    every page, plain names are used (whitenoise serves them from the apps'
    static folders), as for a file added since the last collectstatic.
    Deployments run collectstatic and get hashed, cached files.
    """

    def url(self, name, force=False):
        if not force and not self._collected(name):
            return FileSystemStorage.url(self, name)
        return super().url(name, force)

    def _collected(self, name) -> bool:
        """In the manifest: a file added since the last collectstatic is not (yet)."""
        if not self.hashed_files:
            return False
        path = name.split("?", 1)[0].split("#", 1)[0]
        return self.hash_key(self.clean_name(path)) in self.hashed_files
