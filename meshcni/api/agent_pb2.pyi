from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PodRequest(_message.Message):
    __slots__ = ("container_id", "netns", "ifname", "cni_args", "ips", "pod_name", "pod_namespace", "pod_uid")
    class CniArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    CNI_ARGS_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    netns: str
    ifname: str
    cni_args: _containers.ScalarMap[str, str]
    ips: _containers.RepeatedScalarFieldContainer[str]
    pod_name: str
    pod_namespace: str
    pod_uid: str
    def __init__(self, container_id: _Optional[str] = ..., netns: _Optional[str] = ..., ifname: _Optional[str] = ..., cni_args: _Optional[_Mapping[str, str]] = ..., ips: _Optional[_Iterable[str]] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_uid: _Optional[str] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("container_id", "ifname", "netns", "pod_name", "pod_namespace", "pod_uid", "ips", "mode", "mode_source", "captured", "slot", "listener", "config_json", "added_at")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_UID_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    ifname: str
    netns: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    mode_source: str
    captured: bool
    slot: int
    listener: str
    config_json: str
    added_at: float
    def __init__(self, container_id: _Optional[str] = ..., ifname: _Optional[str] = ..., netns: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., pod_uid: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ..., mode_source: _Optional[str] = ..., captured: _Optional[bool] = ..., slot: _Optional[int] = ..., listener: _Optional[str] = ..., config_json: _Optional[str] = ..., added_at: _Optional[float] = ...) -> None: ...

class PodReply(_message.Message):
    __slots__ = ("pod",)
    POD_FIELD_NUMBER: _ClassVar[int]
    pod: Pod
    def __init__(self, pod: _Optional[_Union[Pod, _Mapping]] = ...) -> None: ...

class CheckReply(_message.Message):
    __slots__ = ("ok", "problems")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPodsReply(_message.Message):
    __slots__ = ("pods",)
    PODS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    def __init__(self, pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ...) -> None: ...

class PodKey(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class PodCounters(_message.Message):
    __slots__ = ("container_id", "pod_name", "pod_namespace", "mode", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    pod_name: str
    pod_namespace: str
    mode: str
    counters: _containers.ScalarMap[str, int]
    def __init__(self, container_id: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., mode: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class CountersReply(_message.Message):
    __slots__ = ("pods",)
    PODS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[PodCounters]
    def __init__(self, pods: _Optional[_Iterable[_Union[PodCounters, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "datapath_loaded", "pin_dir", "cgroup", "node_mode", "enrolled", "pods_by_mode", "features", "degraded", "started_at", "attached_programs", "pending_replayed")
    class PodsByModeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_LOADED_FIELD_NUMBER: _ClassVar[int]
    PIN_DIR_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    NODE_MODE_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    PODS_BY_MODE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_PROGRAMS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    version: str
    datapath_loaded: bool
    pin_dir: str
    cgroup: str
    node_mode: str
    enrolled: int
    pods_by_mode: _containers.ScalarMap[str, int]
    features: _containers.ScalarMap[str, bool]
    degraded: _containers.RepeatedScalarFieldContainer[str]
    started_at: float
    attached_programs: int
    pending_replayed: int
    def __init__(self, version: _Optional[str] = ..., datapath_loaded: _Optional[bool] = ..., pin_dir: _Optional[str] = ..., cgroup: _Optional[str] = ..., node_mode: _Optional[str] = ..., enrolled: _Optional[int] = ..., pods_by_mode: _Optional[_Mapping[str, int]] = ..., features: _Optional[_Mapping[str, bool]] = ..., degraded: _Optional[_Iterable[str]] = ..., started_at: _Optional[float] = ..., attached_programs: _Optional[int] = ..., pending_replayed: _Optional[int] = ...) -> None: ...

class SetModeRequest(_message.Message):
    __slots__ = ("key", "mode")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    mode: str
    def __init__(self, key: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class SetModeReply(_message.Message):
    __slots__ = ("changed", "node_mode")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NODE_MODE_FIELD_NUMBER: _ClassVar[int]
    changed: _containers.RepeatedCompositeFieldContainer[Pod]
    node_mode: str
    def __init__(self, changed: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ..., node_mode: _Optional[str] = ...) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("container_id", "ifname")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    ifname: str
    def __init__(self, container_id: _Optional[str] = ..., ifname: _Optional[str] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("valid",)
    VALID_FIELD_NUMBER: _ClassVar[int]
    valid: _containers.RepeatedCompositeFieldContainer[Attachment]
    def __init__(self, valid: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ...) -> None: ...

class GcReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedCompositeFieldContainer[Attachment]
    def __init__(self, removed: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ...) -> None: ...

class ListenerInfo(_message.Message):
    __slots__ = ("name", "address", "queued")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    queued: int
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., queued: _Optional[int] = ...) -> None: ...

class UpgradeCounters(_message.Message):
    __slots__ = ("graceful", "crash_restarts", "adoptions", "failed", "queued_connections", "in_flight_lost")
    GRACEFUL_FIELD_NUMBER: _ClassVar[int]
    CRASH_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ADOPTIONS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_LOST_FIELD_NUMBER: _ClassVar[int]
    graceful: int
    crash_restarts: int
    adoptions: int
    failed: int
    queued_connections: int
    in_flight_lost: int
    def __init__(self, graceful: _Optional[int] = ..., crash_restarts: _Optional[int] = ..., adoptions: _Optional[int] = ..., failed: _Optional[int] = ..., queued_connections: _Optional[int] = ..., in_flight_lost: _Optional[int] = ...) -> None: ...

class ProxyStatusReply(_message.Message):
    __slots__ = ("container_id", "pod_name", "pod_namespace", "held", "socket", "listeners", "proxy_pids", "handoffs", "refused", "generation", "reacquired", "upgrades")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    PROXY_PIDS_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REACQUIRED_FIELD_NUMBER: _ClassVar[int]
    UPGRADES_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    pod_name: str
    pod_namespace: str
    held: bool
    socket: str
    listeners: _containers.RepeatedCompositeFieldContainer[ListenerInfo]
    proxy_pids: _containers.RepeatedScalarFieldContainer[int]
    handoffs: int
    refused: int
    generation: int
    reacquired: bool
    upgrades: UpgradeCounters
    def __init__(self, container_id: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., held: _Optional[bool] = ..., socket: _Optional[str] = ..., listeners: _Optional[_Iterable[_Union[ListenerInfo, _Mapping]]] = ..., proxy_pids: _Optional[_Iterable[int]] = ..., handoffs: _Optional[int] = ..., refused: _Optional[int] = ..., generation: _Optional[int] = ..., reacquired: _Optional[bool] = ..., upgrades: _Optional[_Union[UpgradeCounters, _Mapping]] = ...) -> None: ...

class UpgradeRequest(_message.Message):
    __slots__ = ("key", "kind", "argv", "stop_signal", "ready_socket", "timeout_seconds")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    STOP_SIGNAL_FIELD_NUMBER: _ClassVar[int]
    READY_SOCKET_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key: str
    kind: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    stop_signal: str
    ready_socket: str
    timeout_seconds: float
    def __init__(self, key: _Optional[str] = ..., kind: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., stop_signal: _Optional[str] = ..., ready_socket: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class UpgradeReply(_message.Message):
    __slots__ = ("kind", "old_pid", "new_pid", "old_exited", "queued", "in_flight_lost", "seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    OLD_PID_FIELD_NUMBER: _ClassVar[int]
    NEW_PID_FIELD_NUMBER: _ClassVar[int]
    OLD_EXITED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_LOST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    old_pid: int
    new_pid: int
    old_exited: bool
    queued: int
    in_flight_lost: int
    seconds: float
    def __init__(self, kind: _Optional[str] = ..., old_pid: _Optional[int] = ..., new_pid: _Optional[int] = ..., old_exited: _Optional[bool] = ..., queued: _Optional[int] = ..., in_flight_lost: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ConnectionEvent(_message.Message):
    __slots__ = ("time_unix_ns", "container_id", "pod_name", "pod_namespace", "kind", "reason", "family", "src", "sport", "dst", "dport", "pid", "uid", "comm", "dropped")
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    SPORT_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    DPORT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    time_unix_ns: int
    container_id: str
    pod_name: str
    pod_namespace: str
    kind: str
    reason: str
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    pid: int
    uid: int
    comm: str
    dropped: int
    def __init__(self, time_unix_ns: _Optional[int] = ..., container_id: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ..., family: _Optional[int] = ..., src: _Optional[str] = ..., sport: _Optional[int] = ..., dst: _Optional[str] = ..., dport: _Optional[int] = ..., pid: _Optional[int] = ..., uid: _Optional[int] = ..., comm: _Optional[str] = ..., dropped: _Optional[int] = ...) -> None: ...

class MapsRequest(_message.Message):
    __slots__ = ("name", "limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    limit: int
    def __init__(self, name: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class MapInfo(_message.Message):
    __slots__ = ("name", "type", "key_size", "value_size", "max_entries", "entries", "purpose", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    entries: int
    purpose: str
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., key_size: _Optional[int] = ..., value_size: _Optional[int] = ..., max_entries: _Optional[int] = ..., entries: _Optional[int] = ..., purpose: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class MapsReply(_message.Message):
    __slots__ = ("pin_dir", "maps", "entries_json", "truncated")
    PIN_DIR_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_JSON_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    pin_dir: str
    maps: _containers.RepeatedCompositeFieldContainer[MapInfo]
    entries_json: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, pin_dir: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[MapInfo, _Mapping]]] = ..., entries_json: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...
