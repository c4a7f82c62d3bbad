"""TinySSD, the single-shot multibox detector of "Dive into Deep Learning", as a library."""
