"""Pure optimizer math on array-API arrays.  No framework is imported here."""
