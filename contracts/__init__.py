"""Pure shared core of cityhub.

The device catalog, wire message structs and codecs, topics, id and timestamp
checks, the error tree, settings loading and the SQL schema. Nothing here does
I/O beyond reading a settings file the caller names; services share only this
package.
"""
