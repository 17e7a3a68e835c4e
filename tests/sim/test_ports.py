"""Ports for simulated backends launched together."""

from __future__ import annotations

import socket

from llamacpp_ha.sim import free_ports


def test_ports_chosen_together_all_differ_and_are_free() -> None:
    # The kernel hands a just-released port out again (2 repeats in 200 calls of a
    # bind-and-release here): fleets launched together once got two URLs for one server.
    ports = free_ports(200)
    assert len(set(ports)) == 200
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # released again once chosen
