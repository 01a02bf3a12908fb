"""What several test modules share: real servers and processes (servers), derived weights files (variants),
Prometheus text (metrics), a rigged stand-in engine (rigged). Test modules import helpers only from here (and
fixtures from conftest.py), never from one another."""
