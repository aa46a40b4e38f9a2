"""The embedded Redis-compatible server: loopback TCP and a unix socket that only its owner may open."""

import stat

import redis

from service.redis_server import MAX_SOCKET_PATH, EmbeddedRedis


def test_the_unix_socket_reaches_the_same_server_as_tcp_and_only_its_owner_may_open_it():
    with EmbeddedRedis(password="p@ss/w#rd:1 &") as server:  # characters a URL must quote: both URLs do
        assert server.local_url.startswith("unix://") and str(server.socket_path) in server.local_url
        over_tcp, over_socket = redis.Redis.from_url(server.url), redis.Redis.from_url(server.local_url)
        over_tcp.set("written-over-tcp", "1")
        assert over_socket.get("written-over-tcp") == b"1"
        mode = server.socket_path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o700
        addresses = [c["addr"] for c in over_tcp.client_list()]
        assert any(str(server.socket_path) in a for a in addresses), addresses
        over_tcp.close()
        over_socket.close()


def test_a_data_directory_too_deep_for_a_socket_path_falls_back_to_tcp(tmp_path):
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with EmbeddedRedis(data_dir=deep) as server:
        assert server.socket_path is None and server.local_url == server.url
        assert redis.Redis.from_url(server.local_url).ping()
        assert not list(deep.glob("*.sock"))
