"""Fuzz corpus of the frame decoder, and the script that generates it."""
