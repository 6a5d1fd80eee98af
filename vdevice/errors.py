"""Errors about specifications (topology, scenario, device names, sizes).

``vdevice`` does no I/O and imports nothing from ``lab``; the CLI maps ``SpecError``
onto exit status 2 like any other bad input. The message names the file, line and
field so the user can fix the YAML without reading our code.
"""

from __future__ import annotations


class SpecError(ValueError):
    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.bare_message = message
        super().__init__(message)

    def located(self, *, file: str | None = None, line: int | None = None,
                field: str | None = None) -> SpecError:
        """The same error with location filled in where it was unknown."""
        return type(self)(self.bare_message, file=self.file or file,
                          line=self.line or line, field=self.field or field)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        elif self.line:
            where = f"line {self.line}"
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        return f"{where}: {self.bare_message}" if where else self.bare_message
