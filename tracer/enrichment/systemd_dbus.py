"""A systemd unit's device sandboxing, asked of systemd itself over D-Bus.

systemd's own answer is the one in force (drop-ins merged, `systemctl
set-property` applied, transient units included), so it is preferred to
reading unit files.  jeepney (pure Python, no libdbus) speaks to the system bus
at `HostPaths.run`/dbus/system_bus_socket.  Any failure (no bus, no jeepney,
unit not loaded, timeout) is None: the caller falls back to the files.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from tracer.host import HostPaths

SYSTEMD = "org.freedesktop.systemd1"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
WANTED = ("PrivateDevices", "DevicePolicy", "DeviceAllow", "NoNewPrivileges")
TIMEOUT_S = 1.0


def system_bus_socket(host: HostPaths) -> str:
    return os.path.join(host.run, "dbus/system_bus_socket")


def _plain(value: Any) -> Any:
    """jeepney returns variants as (signature, value): keep the value."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return value[1]
    return value


def unit_properties_dbus(host: HostPaths, unit: str) -> Optional[dict[str, Any]]:
    """PrivateDevices, DevicePolicy, DeviceAllow and NoNewPrivileges of a loaded
    system unit, as systemd holds them; None when systemd cannot be asked."""
    socket_path = system_bus_socket(host)
    if not os.path.exists(socket_path):
        return None
    try:
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection
    except ImportError:
        return None
    try:
        with open_dbus_connection(f"unix:path={socket_path}", auth_timeout=TIMEOUT_S) as conn:
            manager = DBusAddress("/org/freedesktop/systemd1", bus_name=SYSTEMD,
                                  interface=f"{SYSTEMD}.Manager")
            reply = conn.send_and_get_reply(new_method_call(manager, "GetUnit", "s", (unit,)),
                                            timeout=TIMEOUT_S)
            if reply.header.message_type.name != "method_return":
                return None  # NoSuchUnit: not loaded (a transient unit that ended)
            props = DBusAddress(str(reply.body[0]), bus_name=SYSTEMD,
                                interface="org.freedesktop.DBus.Properties")
            reply = conn.send_and_get_reply(new_method_call(props, "GetAll", "s",
                                                            (SERVICE_IFACE,)), timeout=TIMEOUT_S)
            if reply.header.message_type.name != "method_return":
                return None
            found = {k: _plain(v) for k, v in dict(reply.body[0]).items() if k in WANTED}
    except Exception:  # jeepney raises many kinds (socket, auth, protocol): all mean "ask the files"
        return None
    if set(found) != set(WANTED):
        return None
    return {"PrivateDevices": bool(found["PrivateDevices"]),
            "NoNewPrivileges": bool(found["NoNewPrivileges"]),
            "DevicePolicy": str(found["DevicePolicy"]),
            "DeviceAllow": [[str(spec), str(access)] for spec, access in found["DeviceAllow"]]}
