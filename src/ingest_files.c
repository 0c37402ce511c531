/*
 * ingest_files.c
 *	  Which server files ingestion may read and how they are opened: the
 *	  allowed directories (customer_analytics.ingest_allowed_directories),
 *	  checked on the path given and on the file actually opened, and only
 *	  regular files, opened without blocking.
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "catalog/pg_authid.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "customer_analytics.h"
#include "ingest.h"
#include "pg_compat.h"
#include "utils.h"

/*
 * customer_analytics.ingest_allowed_directories.  Ingestion's one setting
 * says which files it may read, so it is defined here, beside its checks.
 */
static char *allowed_directories = NULL;

void
ca_ingest_init(void)
{
	DefineCustomStringVariable(CA_GUC_PREFIX ".ingest_allowed_directories",
							   "Directories ingest_csv() and ingest_directory() may read from (comma-separated); empty: any.",
							   "The file actually opened is checked, with its links resolved, so neither '..' nor a symbolic link leads out.",
							   &allowed_directories,
							   "",
							   PGC_SUSET,
							   GUC_LIST_INPUT,
							   NULL, NULL, NULL);
}

/*
 * Whether an absolute, canonical path lies in one of the allowed
 * directories (any path when none are set).  Each directory is matched as
 * written and with its links resolved: the path of an opened file has
 * every link resolved, while the setting may well name a link.
 */
static bool
path_is_allowed(const char *canon)
{
	List	   *dirs;
	ListCell   *lc;
	char	   *list;

	if (allowed_directories == NULL || allowed_directories[0] == '\0')
		return true;
	list = pstrdup(allowed_directories);
	if (!SplitDirectoriesString(list, ',', &dirs))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid customer_analytics.ingest_allowed_directories")));
	foreach(lc, dirs)
	{
		char	   *dir = lfirst(lc);
		char	   *real;
		bool		inside;

		canonicalize_path(dir);
		if (path_is_prefix_of_path(dir, canon))
			return true;
		real = realpath(dir, NULL);
		if (real == NULL)
			continue;
		inside = path_is_prefix_of_path(real, canon);
		free(real);
		if (inside)
			return true;
	}
	return false;
}

/* An absolute, canonical path inside the allowed directories, if any. */
char *
ingest_check_server_path(const char *path, const char *what)
{
	char	   *canon = pstrdup(path);

	/* "file" or "directory": each message whole, so that it can be translated */
	bool		dir = strcmp(what, "directory") == 0;

	if (!has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("permission denied to read directory \"%s\"", path)
				 : errmsg("permission denied to read file \"%s\"", path),
				 errdetail("Reading files on the database server needs superuser or the pg_read_server_files role, as COPY FROM a file does."),
				 errhint("Send the data from the client with ingest_csv_text(), or ask an administrator to GRANT pg_read_server_files.")));
	canonicalize_path(canon);
	if (!is_absolute_path(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 dir
				 ? errmsg("directory \"%s\" is not an absolute path", path)
				 : errmsg("file \"%s\" is not an absolute path", path),
				 dir
				 ? errhint("The server reads the directory: give its full path on the database server.")
				 : errhint("The server reads the file: give its full path on the database server.")));
	if (path_contains_parent_reference(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("directory \"%s\" leaves its parent directory with \"..\"", path)
				 : errmsg("file \"%s\" leaves its directory with \"..\"", path)));
	if (!path_is_allowed(canon))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 dir
				 ? errmsg("directory \"%s\" is outside the directories ingestion may read", canon)
				 : errmsg("file \"%s\" is outside the directories ingestion may read", canon),
				 errdetail("customer_analytics.ingest_allowed_directories is \"%s\".", allowed_directories),
				 dir
				 ? errhint("Move its files into one of them, or ask an administrator to allow it.")
				 : errhint("Move the file into one of them, or ask an administrator to allow its directory.")));
	return canon;
}

pg_noreturn static void
refuse_file_type(const char *path, mode_t mode)
{
	ereport(ERROR,
			(errcode(ERRCODE_WRONG_OBJECT_TYPE),
			 errmsg("file \"%s\" is %s, not a regular file", path, ca_file_type_name(mode)),
			 errdetail("Ingestion reads only regular files: a FIFO, socket or device could block the server process, and a directory holds no rows."),
			 S_ISDIR(mode)
			 ? errhint("Use ingest_directory() to load the files of a directory.")
			 : errhint("Write the data to a regular file and load that.")));
}

/*
 * The real path of an open file, as the kernel resolved it when the file
 * was opened: a link swapped in since cannot change it.
 */
static char *
opened_file_path(int fd, const char *path)
{
	char		proc_link[64];
	char		real[MAXPGPATH];
	ssize_t		len;

	snprintf(proc_link, sizeof(proc_link), "/proc/self/fd/%d", fd);
	len = readlink(proc_link, real, sizeof(real));
	if (len >= (ssize_t) sizeof(real))
	{
		len = -1;
		errno = ENAMETOOLONG;
	}
	if (len < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not find the real path of \"%s\" through \"%s\": %m", path, proc_link),
				 errdetail("With customer_analytics.ingest_allowed_directories set, the file actually opened is checked, which needs /proc.")));
	real[len] = '\0';
	return pstrdup(real);
}

/*
 * Refuse an opened file or directory whose real path leaves the allowed
 * directories (a link inside them pointing out), naming where it leads.
 */
void
ingest_check_opened_path(int fd, const char *path, const char *what)
{
	char	   *real;

	if (allowed_directories == NULL || allowed_directories[0] == '\0')
		return;
	real = opened_file_path(fd, path);
	if (!path_is_allowed(real))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 strcmp(what, "directory") == 0
				 ? errmsg("directory \"%s\" leads to \"%s\", outside the directories ingestion may read", path, real)
				 : errmsg("file \"%s\" leads to \"%s\", outside the directories ingestion may read", path, real),
				 errdetail("A symbolic link on its path points out of customer_analytics.ingest_allowed_directories (\"%s\").",
						   allowed_directories),
				 errhint("Copy the data into one of those directories instead of linking to it.")));
}

/*
 * Open a server file to load.  The open does not block (a FIFO without a
 * writer would otherwise hold the backend in open(), deaf to cancel and
 * terminate), and then the descriptor itself is checked: its real path
 * must be inside the allowed directories and it must be a regular file.
 * Everything is read from that same descriptor, so a file swapped for a
 * link after the checks is never read.  The file is a transient one of
 * the current (sub)transaction: an error closes it.
 */
void
ingest_open_server_file(const char *path, ServerFile *f)
{
	struct stat st;
	int			fd;
	int			flags;

	fd = OpenTransientFile(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | PG_BINARY);
	if (fd < 0)
	{
		int			save_errno = errno;

		/* a socket cannot be opened at all: say what it is */
		if (save_errno == ENXIO && stat(path, &st) == 0 && !S_ISREG(st.st_mode))
			refuse_file_type(path, st.st_mode);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read file \"%s\": %m", path)));
	}
	ingest_check_opened_path(fd, path, "file");
	if (fstat(fd, &st) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	if (!S_ISREG(st.st_mode))
		refuse_file_type(path, st.st_mode);

	/* a regular file: plain blocking reads from here on */
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not set file \"%s\" to blocking reads: %m", path)));
	f->fd = fd;
	f->size = st.st_size;
	f->mtime = time_t_to_timestamptz(st.st_mtime) + st.st_mtim.tv_nsec / 1000;
}
