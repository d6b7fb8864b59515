"""Reading tar shards (webdataset, img2dataset, CLIP_benchmark) without losing
samples silently.

`tarfile` stops iterating, without an error, at a header that is cut short
(a shard truncated at a member boundary): the samples after the cut vanish.
A tar written whole ends with two zero blocks (the end-of-archive marker),
so `members` checks for them after the last member and raises
`tarfile.ReadError` when they are not there.
"""

import tarfile

_MARKER = 2 * tarfile.BLOCKSIZE


def members(tar: tarfile.TarFile):
  """The members of the open `tar`, in order; `tarfile.ReadError` when a
  member's header is damaged (tarfile's own check) or the archive ends
  without its end-of-archive marker."""
  end = 0
  for member in tar:
    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    yield member
  tar.fileobj.seek(end)
  marker = tar.fileobj.read(_MARKER)
  if len(marker) < _MARKER or any(marker):
    raise tarfile.ReadError("it ends without tar's end-of-archive marker (cut short?)")
