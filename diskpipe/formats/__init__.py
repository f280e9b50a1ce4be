"""Pure-Python inspectors for disk image formats.

`inspect(source)` tells what an image really is, as `qemu-img info` would
report it; `StreamInspector` does the same for data arriving in chunks.
Importing this package stays light: numpy, python-magic and pycdlib load only
when a call asks for allocation counts or details.
"""

from diskpipe.formats.api import StreamInspector, inspect
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Content, ImageInfo

__all__ = ["Content", "FormatError", "ImageInfo", "StreamInspector", "inspect"]
