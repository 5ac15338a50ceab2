"""The shipped exception list ``recommended``: files a web server writes
every day by design, each entry with its reason and, where one exists, the
public source of the behaviour.

``[rule] exceptions = recommended`` turns it on (the packaged collector.conf
does); ``none`` is the rule exactly as published. Every entry names where
and, where it narrows the risk, what: an exception never covers a file a web
server would execute from its web root (``.php`` in ``uploads/`` still
alerts), and none names a whole directory a shell could be dropped in and
called from.
"""

from __future__ import annotations

from agent.shared.exceptions import RuleException

IMAGE_EXTENSIONS = (
    "jpg", "jpeg", "JPG", "JPEG", "png", "PNG", "gif", "GIF", "webp", "avif", "bmp", "ico", "heic",
    "tif", "tiff", "pdf", "PDF",
)  # fmt: skip


def _entry(
    name: str, comment: str, source: str, missing: tuple[str, ...] = (), **conditions: tuple[str, ...]
) -> RuleException:
    fields = tuple((k.replace("__", "."), v) for k, v in conditions.items())
    return RuleException(f"recommended.{name}", fields, None, comment, source, missing)


RECOMMENDED: tuple[RuleException, ...] = (
    _entry(
        "php-sessions",
        "PHP's files session handler writes sess_<id> per visitor into session.save_path",
        "https://www.php.net/manual/en/session.configuration.php#ini.session.save-path",
        # sess_<id> (the id has no dot) wherever save_path points: Debian's
        # /var/lib/php/sessions, RHEL's /var/lib/php/session, a temp dir, an app's own
        file__name=("sess_*",),
        missing=("file.extension",),
    ),
    _entry(
        "php-upload-temp",
        "PHP stores each uploaded file as php<6 random characters> in upload_tmp_dir "
        "before the script moves it",
        "https://www.php.net/manual/en/features.file-upload.post-method.php",
        file__path=("*/tmp/php??????",),
        missing=("file.extension",),  # php + 6 letters and digits: never a script name
    ),
    _entry(
        "laravel-framework",
        "Laravel's file session, cache and compiled-view stores (outside the public/ web root)",
        "https://laravel.com/docs/session#configuration",
        file__path=(
            "*/storage/framework/sessions/*",
            "*/storage/framework/cache/data/*",
            "*/storage/framework/views/*.php",
        ),
    ),
    _entry(
        "nginx-temp",
        "nginx buffers large request bodies and upstream replies to numbered temp files",
        "https://nginx.org/en/docs/http/ngx_http_core_module.html#client_body_temp_path",
        process__name=("nginx", "openresty"),
        file__path=(
            "/var/lib/nginx/body/*",
            "/var/lib/nginx/proxy/*",
            "/var/lib/nginx/fastcgi/*",
            "/var/lib/nginx/uwsgi/*",
            "/var/lib/nginx/scgi/*",
            "/var/lib/nginx/tmp/*",  # RHEL: /var/lib/nginx/tmp/{client_body,proxy,...}
            "/var/cache/nginx/*",  # nginx.org packages and proxy_cache_path
            "/usr/local/openresty/nginx/*_temp/*",
        ),
    ),
    _entry(
        "image-uploads",
        "images and documents stored by an upload form (a script extension in uploads/ still alerts)",
        "https://developer.wordpress.org/reference/functions/wp_upload_dir/",
        file__path=("*/uploads/*", "*/wp-content/uploads/*", "*/media/*", "*/files/*"),
        file__extension=IMAGE_EXTENSIONS,
    ),
    _entry(
        "page-cache",
        "page caches written to disk as HTML, gzip or serialised data (not as scripts)",
        "https://wordpress.org/plugins/wp-super-cache/",
        file__path=("*/cache/*",),
        file__extension=("html", "htm", "gz", "br", "json", "cache", "tmp", "txt", "ser"),
    ),
    _entry(
        "app-logs",
        "applications' own log files, one a day or a rotation (a log is not run by the server)",
        "https://www.php-fig.org/psr/psr-3/",
        file__path=("*/log/*", "*/logs/*", "*/var/log/*"),
        file__extension=("log",),
    ),
    _entry(
        "dpkg-files",
        "dpkg unpacks a package's files as NAME.dpkg-new (and keeps .dpkg-old/.dpkg-dist) "
        "before renaming them into place",
        "https://manpages.debian.org/bookworm/dpkg/dpkg.1.en.html",
        file__extension=("dpkg-new", "dpkg-tmp", "dpkg-old", "dpkg-dist", "ucf-new", "ucf-old", "ucf-dist"),
    ),
    _entry(
        "python-bytecode",
        "Python writes compiled bytecode next to imported modules (and a temp file it renames)",
        "https://peps.python.org/pep-3147/",
        file__path=("*/__pycache__/*.pyc", "*/__pycache__/*.pyc.*"),
    ),
)

LISTS = {"recommended": RECOMMENDED}
