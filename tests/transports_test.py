"""One class per driver_volume_type: the factory, vdsm's path rules, how
udev matches a device, what the connector is handed, the fields each type
needs, the local device check."""

import os

import pytest

from vdsm_managedvolume import config
from vdsm_managedvolume import errors
from vdsm_managedvolume import transports
from vdsm_managedvolume.transports import base

VOL = "9f3c1e0a-55b1-4f07-9d6c-2f2f4a9e8f10"


@pytest.fixture
def cfg(tmp_path):
    return config.with_state_dir(config.Config(), str(tmp_path / "state"))


def test_each_type_with_a_rule_of_its_own_has_a_class():
    assert transports.names() == ["fibre_channel", "iscsi", "lightos",
                                  "local", "nvmeof", "rbd", "storpool"]
    for name in transports.names():
        assert transports.get(name).name == name


@pytest.mark.parametrize("name", ["x", "scaleio", "", None])
def test_other_types_get_the_default_transport(name):
    assert type(transports.get(name)) is base.Transport


@pytest.mark.parametrize("name", ["iscsi", "fibre_channel"])
def test_scsi_path_is_the_multipath_device(cfg, name):
    attachment = {"type": "block", "path": "/dev/dm-3",
                  "multipath_id": "36001405abc", "scsi_wwn": "36001405abc"}
    path = transports.get(name).path(
        cfg, VOL, {"driver_volume_type": name, "data": {}}, attachment)
    assert path == os.path.join(cfg.multipath_dir, "36001405abc")


@pytest.mark.parametrize("name", ["iscsi", "fibre_channel"])
def test_scsi_without_multipath_id_is_928(cfg, name):
    with pytest.raises(errors.UnsupportedDevice) as e:
        transports.get(name).path(
            cfg, VOL, {"driver_volume_type": name, "data": {}},
            {"type": "block", "path": "/dev/sdb"})
    assert e.value.code == 928
    assert name in str(e.value)


def test_rbd_path_is_pool_and_volume_under_rbd_dir(cfg):
    ci = {"driver_volume_type": "rbd", "data": {"name": "pool/volume-1"}}
    path = transports.get("rbd").path(
        cfg, VOL, ci, {"type": "block", "path": "/dev/rbd0"})
    assert path == os.path.join(cfg.rbd_dir, "pool", "volume-1")


def test_default_path_is_the_attachment_path(cfg):
    ci = {"driver_volume_type": "nvmeof", "data": {}}
    assert transports.get("nvmeof").path(
        cfg, VOL, ci, {"path": "/dev/nvme0n3"}) == "/dev/nvme0n3"
    with pytest.raises(errors.HelperFailed, match="no device path"):
        transports.get("nvmeof").path(cfg, VOL, ci, {"type": "block"})


def test_local_refuses_what_is_not_a_block_device_naming_the_field(
        cfg, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    ci = {"driver_volume_type": "local", "data": {"device_path": str(f)}}
    with pytest.raises(errors.InvalidParams,
                       match="connection_info.data.device_path"):
        transports.get("local").check(cfg, ci)


def test_other_types_have_no_checks_of_their_own(cfg):
    transports.get("x").check(cfg, {"driver_volume_type": "x", "data": {}})


def test_identity_of_a_file_is_none(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert transports.get("iscsi").identity(str(f)) is None


# How udev matches the device: from the path, by the transports' table

@pytest.mark.parametrize("path, match", [
    ("/dev/mapper/3600a", ("SYMLINK", "mapper/3600a")),
    ("/dev/rbd/pool/vol-1", ("SYMLINK", "rbd/pool/vol-1")),
    ("/dev/rbd/pool/ns/vol-1", ("SYMLINK", "rbd/pool/ns/vol-1")),
    ("/dev/nvme0n3", ("KERNEL", "nvme0n3")),
    ("/dev/loop7", ("KERNEL", "loop7")),
    # Named relative to /dev as os.path.relpath names them.
    ("/dev/disk/../nvme0n4", ("KERNEL", "nvme0n4")),
    ("/dev//nvme0n5", ("KERNEL", "nvme0n5")),
    ("/devices/x", ("KERNEL", "../devices/x")),
])
def test_udev_match_of_default_paths(path, match):
    assert transports.udev_match(path) == match


def test_udev_match_names_configured_dirs_as_udev_sees_them(cfg):
    assert transports.udev_match(
        os.path.join(cfg.multipath_dir, "3600a"), cfg) == \
        ("SYMLINK", "mapper/3600a")
    assert transports.udev_match(
        os.path.join(cfg.rbd_dir, "pool", "v"), cfg) == \
        ("SYMLINK", "rbd/pool/v")


def test_udev_match_of_another_symlink_is_the_link(tmp_path):
    link = tmp_path / "by-id-x"
    link.symlink_to("/dev/null")
    assert transports.udev_match(str(link))[0] == "SYMLINK"


def test_stable_link_dirs_come_from_the_transports(cfg):
    assert transports.link_dirs(cfg) == [(cfg.multipath_dir, "mapper"),
                                         (cfg.rbd_dir, "rbd")]
    assert transports.device_dirs(cfg) == ("/dev", cfg.multipath_dir,
                                           cfg.rbd_dir)
    assert transports.device_dirs() == ("/dev", "/dev/mapper", "/dev/rbd")


# What the privsep daemon hands os-brick's connector

def test_rbd_connector_maps_the_image_on_this_host():
    rbd = transports.get("rbd")
    assert rbd.connector_kwargs == {"do_local_attach": True}
    ci = {"driver_volume_type": "rbd", "data": {"name": "p/v"}}
    assert rbd.connector_data(ci) == {"name": "p/v",
                                      "do_local_attach": True}
    assert rbd.connector_data(ci, {"path": "/dev/rbd/p/v"}) == {
        "name": "p/v", "do_local_attach": True, "device_path": "/dev/rbd/p/v"}
    assert ci["data"] == {"name": "p/v"}


@pytest.mark.parametrize("name", ["iscsi", "nvmeof", "local", "x"])
def test_other_connectors_get_a_copy_of_data(name):
    ci = {"driver_volume_type": name, "data": {"a": 1}}
    t = transports.get(name)
    assert t.connector_kwargs == {}
    data = t.connector_data(ci, {"path": "/dev/sdb"})
    assert data == {"a": 1} and data is not ci["data"]


# Fields: what os-brick's connector would certainly fail on, named

GOOD = [
    ("iscsi", {"target_portal": "192.0.2.1:3260",
               "target_iqn": "iqn.2026-11.org.example:v", "target_lun": 1}),
    ("iscsi", {"target_portal": "192.0.2.1:3260",
               "target_iqn": "iqn.2026-11.org.example:v", "target_lun": 0}),
    ("iscsi", {"target_portals": ["192.0.2.1:3260", "192.0.2.2:3260"],
               "target_iqns": ["iqn.x:a", "iqn.x:b"],
               "target_luns": [1, 1]}),
    ("iscsi", {"target_portals": ["192.0.2.1:3260"],
               "target_iqns": ["iqn.x:a"], "target_lun": 3}),
    # Single-portal keys beside the lists, as Cinder sends them.
    ("iscsi", {"target_portal": "192.0.2.1:3260", "target_iqn": "iqn.x:a",
               "target_lun": 1, "target_portals": ["192.0.2.1:3260"],
               "target_iqns": ["iqn.x:a"], "target_luns": [1]}),
    ("fibre_channel", {"target_wwn": "500a0981", "target_lun": 1}),
    ("fibre_channel", {"target_wwn": ["500a0981", "500a0982"],
                       "target_lun": 1}),
    ("fibre_channel", {"target_wwn": ["500a0981", "500a0982"],
                       "target_luns": [1, 2]}),
    ("fibre_channel", {"target_wwns": ["500a0981"], "target_luns": [4]}),
    ("fibre_channel", {"target_wwn": "500a0981"}),
    ("nvmeof", {"target_nqn": "nqn.x", "portals": [["192.0.2.3", 4420,
                                                    "tcp"]]}),
    ("nvmeof", {"nqn": "nqn.x", "target_portal": "192.0.2.3",
                "target_port": 4420, "transport_type": "tcp"}),
    ("nvmeof", {"vol_uuid": "0d4b0fe16a694a2e9f634c8f3bd6f0a1",
                "replica_count": None, "volume_replicas": [
                    {"target_nqn": "nqn.x", "portals": [["192.0.2.3", "4420",
                                                         "RoCEv2"]]}]}),
    ("lightos", {"uuid": "u-1", "subsysnqn": "nqn.x", "lightos_nodes": {
        "192.0.2.4": {"transport_type": "tcp", "target_portal": "192.0.2.4",
                      "target_port": 8009}}}),
    ("storpool", {"client_id": 1, "volume": "v-1", "access_mode": "rw"}),
    ("storpool", {"client_id": 1, "volume": "v-1", "access_mode": "ro"}),
    ("rbd", {"name": "pool/image"}),
]


@pytest.mark.parametrize("dvt, data", GOOD)
def test_shapes_the_connector_accepts_pass(cfg, dvt, data):
    transports.get(dvt).check(cfg, {"driver_volume_type": dvt,
                                    "data": data})


BAD = [
    ("iscsi", {"target_iqn": "iqn.x:a", "target_lun": 1}, "target_portal"),
    ("iscsi", {"target_portal": "192.0.2.1:3260", "target_lun": 1},
     "target_iqn"),
    ("iscsi", {"target_portal": "192.0.2.1:3260", "target_iqn": "iqn.x:a"},
     "target_lun"),
    ("iscsi", {"target_portal": ["192.0.2.1:3260"], "target_iqn": "iqn.x:a",
               "target_lun": 1}, "target_portal"),
    ("iscsi", {"target_portals": "192.0.2.1:3260", "target_iqns": ["i"],
               "target_lun": 1}, "target_portals"),
    ("iscsi", {"target_portals": ["192.0.2.1:3260"], "target_iqns": [],
               "target_lun": 1}, "target_iqns"),
    ("iscsi", {"target_portals": ["192.0.2.1:3260"], "target_iqns": [7],
               "target_lun": 1}, "target_iqns[0]"),
    ("iscsi", {"target_portal": "192.0.2.1:3260", "target_iqn": "iqn.x:a",
               "target_lun": None}, "target_lun"),
    ("iscsi", {"target_portal": "192.0.2.1:3260", "target_iqn": "iqn.x:a",
               "target_lun": "a"}, "target_lun"),
    ("iscsi", {"target_portals": ["192.0.2.1:3260"], "target_iqns": ["i"],
               "target_luns": ["1"]}, "target_luns[0]"),
    ("fibre_channel", {"target_lun": 1}, "target_wwn"),
    ("fibre_channel", {"target_wwn": 5000, "target_lun": 1}, "target_wwn"),
    ("fibre_channel", {"target_wwn": ["500a", 7], "target_lun": 1},
     "target_wwn[1]"),
    ("fibre_channel", {"target_wwn": "500a", "target_lun": "1"},
     "target_lun"),
    ("fibre_channel", {"target_wwn": ["500a", "500b"],
                       "target_luns": [1, 2, 3]}, "target_luns"),
    ("nvmeof", {"target_nqn": "nqn.x"}, "portals"),
    ("nvmeof", {"target_nqn": "nqn.x", "portals": []}, "portals"),
    ("nvmeof", {"target_nqn": "nqn.x", "portals": [["a", 1]]},
     "portals[0]"),
    ("nvmeof", {"target_nqn": 7, "portals": [["a", 1, "tcp"]]},
     "target_nqn"),
    ("nvmeof", {"nqn": "nqn.x", "target_portal": "a", "target_port": 1},
     "transport_type"),
    ("nvmeof", {"volume_replicas": [{"target_nqn": "n",
                                     "portals": [["a", 1, "tcp"]]}],
                "replica_count": 1}, "vol_uuid"),
    ("nvmeof", {"volume_replicas": [{"target_nqn": "n",
                                     "portals": [["a", 1, "tcp"]]}],
                "replica_count": 1, "vol_uuid": "x"}, "vol_uuid"),
    ("nvmeof", {"volume_replicas": [{"target_nqn": "n",
                                     "portals": [["a", 1, "tcp"]]}],
                "vol_uuid": "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"},
     "replica_count"),
    ("nvmeof", {"volume_replicas": [{"portals": [["a", 1, "tcp"]]}],
                "replica_count": 1,
                "vol_uuid": "0d4b0fe1-6a69-4a2e-9f63-4c8f3bd6f0a1"},
     "volume_replicas[0].target_nqn"),
    ("lightos", {"subsysnqn": "nqn.x"}, "uuid"),
    ("lightos", {"uuid": "u", "lightos_nodes": ["192.0.2.4"]},
     "lightos_nodes"),
    ("storpool", {"volume": "v", "access_mode": "rw"}, "client_id"),
    ("storpool", {"client_id": 1, "access_mode": "rw"}, "volume"),
    ("storpool", {"client_id": 1, "volume": "v"}, "access_mode"),
    ("storpool", {"client_id": 1, "volume": "v", "access_mode": "RW"},
     "access_mode"),
    # os-brick 7's RBDConnector: pool, volume = name.split('/').
    ("rbd", {"name": "pool/namespace/image"}, "name"),
]


@pytest.mark.parametrize("dvt, data, field", BAD)
def test_what_the_connector_would_fail_on_is_refused_naming_the_field(
        cfg, dvt, data, field):
    with pytest.raises(errors.InvalidParams) as e:
        transports.get(dvt).check(cfg, {"driver_volume_type": dvt,
                                        "data": data})
    assert e.value.name == "connection_info.data." + field


@pytest.mark.parametrize("dvt, data, field", BAD)
def test_a_vendor_adapter_reads_its_own_fields(cfg, dvt, data, field):
    transports.get(dvt).check(cfg, {"driver_volume_type": dvt,
                                    "adapter": "acme", "data": data})


@pytest.mark.parametrize("bad", [
    None, 7, "", "image", "pool/", "/image", "pool//image", "a/b/c/d",
    "pool/..", "../image", "pool/./image", "pool/im age", "pool/im\nage",
    "pool/image/"])
def test_rbd_name_is_checked_before_it_becomes_a_device_path(cfg, bad):
    for adapter in (None, "acme"):
        ci = {"driver_volume_type": "rbd", "data": {"name": bad},
              "adapter": adapter}
        with pytest.raises(errors.InvalidParams) as e:
            transports.get("rbd").check(cfg, ci)
        assert e.value.name == "connection_info.data.name"


def test_rbd_name_is_not_required_of_other_types(cfg):
    data = dict(GOOD[0][1], name="../x")
    transports.get("iscsi").check(cfg, {"driver_volume_type": "iscsi",
                                        "data": data})


def test_the_daemon_is_configured_with_every_stable_link_dir():
    # The privsep daemon writes rules from its own configuration file:
    # a transport's link directory must be among the keys it gets.
    from vdsm_managedvolume import privsepconfig
    for name in transports.names():
        links = transports.get(name).stable_links
        if links is not None:
            assert links[0] in privsepconfig.UDEV_KEYS


def test_host_commands_each_connector_runs():
    tools = {name: [cmd for cmd, _ in transports.get(name).host_tools]
             for name in transports.names()}
    assert tools == {"iscsi": ["iscsiadm", "multipath", "multipathd"],
                     "fibre_channel": ["multipath", "multipathd"],
                     "nvmeof": ["nvme"], "rbd": ["rbd"], "lightos": [],
                     "storpool": [], "local": []}
    for name in transports.names():
        for cmd, package in transports.get(name).host_tools:
            assert package


def test_an_iscsi_login_of_the_connections_targets_is_its_connect_command():
    # What a disconnect waits for (brick._wait_earlier): os-brick's
    # "iscsiadm -m node -T <iqn> -p <portal> --login" of one of its
    # targets, under any portal; not another target's, not another
    # iscsiadm command of its target, not a single-path login either.
    ci = {"driver_volume_type": "iscsi",
          "data": {"target_portal": "192.0.2.1:3260",
                   "target_iqn": "iqn.2026-12.org.example:a",
                   "target_lun": 1,
                   "target_portals": ["192.0.2.1:3260", "192.0.2.2:3260"],
                   "target_iqns": ["iqn.2026-12.org.example:a",
                                   "iqn.2026-12.org.example:b"]}}
    match = transports.get("iscsi").connect_command(ci)

    def login(iqn, *more):
        return ["iscsiadm", "-m", "node", "-T", iqn, "-p",
                "192.0.2.9:3260"] + list(more)

    assert match(login("iqn.2026-12.org.example:b", "--login")) \
        == "iscsiadm --login"
    assert match(["/bin/sh", "/usr/sbin/iscsiadm"] + login(
        "iqn.2026-12.org.example:a", "--login")[1:]) == "iscsiadm --login"
    assert match(["iscsiadm", "-m", "node", "--targetname="
                  "iqn.2026-12.org.example:a", "-l"]) == "iscsiadm --login"
    assert match(login("iqn.2026-12.org.example:c", "--login")) is None
    assert match(login("iqn.2026-12.org.example:a", "--op", "update", "-n",
                       "node.session.auth.password", "-v", "x")) is None
    assert match(["echo", "-T", "iqn.2026-12.org.example:a",
                  "--login"]) is None
    single = {"driver_volume_type": "iscsi",
              "data": {"target_portal": "192.0.2.1:3260",
                       "target_iqn": "iqn.2026-12.org.example:s",
                       "target_lun": 0}}
    assert transports.get("iscsi").connect_command(single)(
        login("iqn.2026-12.org.example:s", "--login")) == "iscsiadm --login"


def test_an_rbd_map_of_the_image_is_its_connect_command():
    ci = {"driver_volume_type": "rbd", "data": {"name": "pool/vol-1"}}
    match = transports.get("rbd").connect_command(ci)
    assert match(["rbd", "map", "vol-1", "--pool", "pool", "--id",
                  "admin"]) == "rbd map"
    assert match(["/usr/bin/rbd", "device", "map", "pool/vol-1"]) \
        == "rbd map"
    assert match(["rbd", "map", "vol-2", "--pool", "pool"]) is None
    assert match(["rbd", "map", "vol-1", "--pool", "other"]) is None
    assert match(["rbd", "unmap", "/dev/rbd0"]) is None


def test_an_nvme_connect_of_its_subsystem_is_its_connect_command():
    match = transports.get("nvmeof").connect_command(
        {"driver_volume_type": "nvmeof",
         "data": {"target_nqn": "nqn.2026-12.org.example:s1",
                  "portals": [["192.0.2.7", "4420", "tcp"]]}})
    argv = ["nvme", "connect", "-a", "192.0.2.7", "-s", "4420", "-t", "tcp",
            "-n", "nqn.2026-12.org.example:s1", "-Q", "128", "-l", "-1"]
    assert match(argv) == "nvme connect"
    assert match(["/usr/sbin/nvme", "connect",
                  "--nqn=nqn.2026-12.org.example:s1"]) == "nvme connect"
    assert match(argv[:-5] + ["nqn.2026-12.org.example:s2"]) is None
    assert match(["nvme", "disconnect", "-n",
                  "nqn.2026-12.org.example:s1"]) is None
    replicated = transports.get("nvmeof").connect_command(
        {"driver_volume_type": "nvmeof",
         "data": {"vol_uuid": "c20aba21-6ef6-446b-b374-45733b4883ba",
                  "replica_count": 2,
                  "volume_replicas": [
                      {"target_nqn": "nqn.2026-12.org.example:r1"},
                      {"target_nqn": "nqn.2026-12.org.example:r2"}]}})
    assert replicated(["nvme", "connect", "-n",
                       "nqn.2026-12.org.example:r2"]) == "nvme connect"


@pytest.mark.parametrize("name, data", [
    ("iscsi", {"target_iqn": "iqn.2026-12.org.example:a",
               "target_portal": "192.0.2.1:3260", "target_lun": 1,
               "target_iqns": [["nested"], {"a": 1}, 7]}),
    ("iscsi", {"target_iqn": "iqn.2026-12.org.example:a",
               "target_portal": "192.0.2.1:3260", "target_lun": 1,
               "target_iqns": 7}),
    ("nvmeof", {"target_nqn": ["nested"], "nqn": {"a": 1},
                "volume_replicas": [{"target_nqn": ["x"]}, 7]}),
    ("nvmeof", {"target_nqn": "nqn.2026-12.org.example:s1",
                "volume_replicas": 7}),
])
def test_odd_values_validation_lets_through_do_not_break_a_disconnect(
        name, data):
    # A disconnect asks for the matcher before anything (brick.
    # _wait_earlier): a value validation accepts (target_iqns is checked
    # only with target_portals) must not raise there, or the volume
    # could never be detached (review-safety10 L-2).
    match = transports.get(name).connect_command(
        {"driver_volume_type": name, "data": data})
    assert match is None or match(["true"]) is None


def test_types_without_a_lasting_connect_command_have_none():
    for name, data in (("fibre_channel", {"target_wwn": "50"}),
                       ("local", {"device_path": "/dev/loop0"})):
        ci = {"driver_volume_type": name, "data": data}
        assert transports.get(name).connect_command(ci) is None
