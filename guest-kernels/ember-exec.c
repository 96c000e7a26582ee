/*
 * ember-exec: enter a container image's root and run its command, as the
 * guest init's last step for `ember run IMAGE` (see guest-kernels/init and
 * src/image/spec.rs).
 *
 *   ember-exec ROOT
 *
 * Reads the run spec from /ember/image/ (argv and env NUL-separated; workdir,
 * user), then, like a container runtime's final steps (runc's
 * libcontainer/init_linux.go: finalizeNamespace, setupUser):
 *   chroot(ROOT); create and enter the working directory; resolve USER[:GROUP]
 *   against the image's /etc/passwd and /etc/group (names or numeric ids);
 *   setgroups (the user's supplementary groups), setgid, setuid; HOME from
 *   passwd when the environment has none; execve, searching the PATH of the
 *   image's environment (not ours) for a name without a `/`.
 * A command that cannot be found exits 127, one that cannot be executed 126,
 * with Docker's message shape; the init turns that into ember's exit code.
 *
 * Written in C with glibc, statically linked: it must run before and after
 * chroot without any library from the image (which may have no libc at all).
 * Users and groups are parsed by hand: getpwnam() in a static binary would
 * want NSS modules.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SPEC "/ember/image/"

static void die(int code, const char *fmt, const char *arg)
{
	fprintf(stderr, "ember: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(code);
}

/* The whole file, NUL-terminated; *len gets its length. */
static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap + 1);
	size_t r;
	while (buf && (r = fread(buf + n, 1, cap - n, f)) > 0) {
		n += r;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 1);
		}
	}
	fclose(f);
	if (!buf)
		die(125, "%s", "out of memory");
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

/* Splits NUL-separated strings into a NULL-terminated vector. */
static char **split(char *buf, size_t len)
{
	size_t count = 0;
	for (size_t i = 0; i < len; i++)
		count += buf[i] == 0;
	char **v = calloc(count + 1, sizeof(char *));
	if (!v)
		die(125, "%s", "out of memory");
	size_t k = 0;
	for (size_t i = 0; i < len && k < count; k++) {
		v[k] = buf + i;
		i += strlen(buf + i) + 1;
	}
	return v;
}

static int all_digits(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

/* Field `idx` (0-based) of a colon-separated line, copied into out. */
static int field(const char *line, int idx, char *out, size_t outlen)
{
	const char *p = line;
	for (int i = 0; i < idx; i++) {
		p = strchr(p, ':');
		if (!p)
			return -1;
		p++;
	}
	size_t n = strcspn(p, ":\n");
	if (n >= outlen)
		n = outlen - 1;
	memcpy(out, p, n);
	out[n] = 0;
	return 0;
}

/* Finds NAME or UID in /etc/passwd: fills uid, gid, home. */
static int lookup_user(const char *who, uid_t *uid, gid_t *gid, char *home, size_t homelen, char *name, size_t namelen)
{
	char *pw = slurp("/etc/passwd", NULL);
	if (!pw)
		return -1;
	int found = -1;
	for (char *line = strtok(pw, "\n"); line; line = strtok(NULL, "\n")) {
		char n[256], u[32], g[32];
		if (field(line, 0, n, sizeof n) || field(line, 2, u, sizeof u) || field(line, 3, g, sizeof g))
			continue;
		if (strcmp(n, who) == 0 || (all_digits(who) && strcmp(u, who) == 0)) {
			*uid = (uid_t)strtoul(u, NULL, 10);
			*gid = (gid_t)strtoul(g, NULL, 10);
			field(line, 5, home, homelen);
			snprintf(name, namelen, "%s", n);
			found = 0;
			break;
		}
	}
	free(pw);
	return found;
}

/* A group NAME or GID -> gid. */
static int lookup_group(const char *what, gid_t *gid)
{
	if (all_digits(what)) {
		*gid = (gid_t)strtoul(what, NULL, 10);
		return 0;
	}
	char *gr = slurp("/etc/group", NULL);
	if (!gr)
		return -1;
	int found = -1;
	for (char *line = strtok(gr, "\n"); line; line = strtok(NULL, "\n")) {
		char n[256], g[32];
		if (field(line, 0, n, sizeof n) || field(line, 2, g, sizeof g))
			continue;
		if (strcmp(n, what) == 0) {
			*gid = (gid_t)strtoul(g, NULL, 10);
			found = 0;
			break;
		}
	}
	free(gr);
	return found;
}

/* Supplementary groups of user `name` from /etc/group, plus `primary`. */
static int user_groups(const char *name, gid_t primary, gid_t *out, int max)
{
	int n = 0;
	out[n++] = primary;
	char *gr = slurp("/etc/group", NULL);
	if (!gr)
		return n;
	for (char *line = strtok(gr, "\n"); line && n < max; line = strtok(NULL, "\n")) {
		char g[32], members[4096];
		if (field(line, 2, g, sizeof g) || field(line, 3, members, sizeof members))
			continue;
		/* Walked by hand: the outer loop's strtok must keep its place. */
		char *p = members;
		while (*p && n < max) {
			size_t len = strcspn(p, ",");
			if (len == strlen(name) && strncmp(p, name, len) == 0) {
				out[n++] = (gid_t)strtoul(g, NULL, 10);
				break;
			}
			p += len + (p[len] == ',');
		}
	}
	free(gr);
	return n;
}

static char *env_get(char **env, const char *key)
{
	size_t k = strlen(key);
	for (; *env; env++)
		if (strncmp(*env, key, k) == 0 && (*env)[k] == '=')
			return *env + k + 1;
	return NULL;
}

static void mkdir_p(const char *path)
{
	char buf[4096];
	snprintf(buf, sizeof buf, "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(buf, 0755);
			*p = '/';
		}
	}
	mkdir(buf, 0755);
}

int main(int argc, char **argv)
{
	if (argc != 2)
		die(125, "%s", "usage: ember-exec ROOT");
	size_t alen, elen;
	char *abuf = slurp(SPEC "argv", &alen);
	char *ebuf = slurp(SPEC "env", &elen);
	char *workdir = slurp(SPEC "workdir", NULL);
	char *user = slurp(SPEC "user", NULL);
	if (!abuf || !ebuf || !workdir || !user)
		die(125, "%s", "the run spec in " SPEC " is incomplete");
	char **args = split(abuf, alen);
	char **env0 = split(ebuf, elen);
	if (!args[0])
		die(125, "%s", "no command to run");

	if (chroot(argv[1]) != 0 || chdir("/") != 0)
		die(125, "cannot enter the image root: %s", strerror(errno));

	/* USER[:GROUP] */
	uid_t uid = 0;
	gid_t gid = 0;
	char home[1024] = "/", name[256] = "";
	char *group = strchr(user, ':');
	if (group)
		*group++ = 0;
	int have_passwd = 0;
	if (*user) {
		if (lookup_user(user, &uid, &gid, home, sizeof home, name, sizeof name) == 0)
			have_passwd = 1;
		else if (all_digits(user)) {
			uid = (uid_t)strtoul(user, NULL, 10);
			gid = 0;
		} else
			die(125, "unable to find user %s: no matching entries in passwd file", user);
	} else if (lookup_user("0", &uid, &gid, home, sizeof home, name, sizeof name) == 0) {
		have_passwd = 1;
	}
	gid_t groups[64];
	int ngroups = 1;
	groups[0] = gid;
	if (group && *group) {
		if (lookup_group(group, &gid) != 0)
			die(125, "unable to find group %s: no matching entries in group file", group);
		groups[0] = gid;
	} else if (have_passwd) {
		ngroups = user_groups(name, gid, groups, 64);
	}

	/* Docker creates a missing working directory (as root, before the switch). */
	mkdir_p(workdir);
	if (setgroups(ngroups, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0)
		die(125, "cannot switch to the image's user: %s", strerror(errno));
	if (chdir(workdir) != 0)
		die(126, "cannot enter the working directory %s", workdir);

	/* HOME from passwd when the image's environment has none. */
	size_t n = 0;
	while (env0[n])
		n++;
	char **env = calloc(n + 2, sizeof(char *));
	memcpy(env, env0, n * sizeof(char *));
	if (!env_get(env, "HOME")) {
		char *h = malloc(strlen(home) + 6);
		sprintf(h, "HOME=%s", *home ? home : "/");
		env[n++] = h;
	}
	env[n] = NULL;

	const char *cmd = args[0];
	if (strchr(cmd, '/')) {
		execve(cmd, args, env);
		die(errno == ENOENT ? 127 : 126, "exec: \"%s\": no such file or not executable", cmd);
	}
	const char *path = env_get(env, "PATH");
	if (!path)
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	int saw_eacces = 0;
	for (const char *p = path; *p;) {
		size_t len = strcspn(p, ":");
		char full[4096];
		snprintf(full, sizeof full, "%.*s/%s", (int)(len ? len : 1), len ? p : ".", cmd);
		execve(full, args, env);
		if (errno == EACCES)
			saw_eacces = 1;
		p += len + (p[len] == ':');
	}
	if (saw_eacces)
		die(126, "exec: \"%s\": permission denied", cmd);
	die(127, "exec: \"%s\": executable file not found in $PATH", cmd);
	return 127;
}
