"""Engines, the tables of each database, portable types and the migration histories."""
