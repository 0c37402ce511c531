/*
 * ingest_source.c
 *	  The byte source of a load (a server file or client text): read by
 *	  position, fed to COPY's parser in chunks, and hashed (SHA-256) once,
 *	  in order, even across the parser restarts that skip a bad line.
 */
#include "postgres.h"

#include "common/sha2.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "ingest.h"

size_t
ingest_source_pread(ByteSource *src, int64 pos, char *buf, size_t n)
{
	if (pos >= src->size || n == 0)
		return 0;
	n = Min(n, (size_t) (src->size - pos));
	if (src->fd < 0)
	{
		memcpy(buf, src->data + pos, n);
		return n;
	}
	for (size_t done = 0; done < n;)
	{
		ssize_t		got = pg_pread(src->fd, buf + done, n - done, (off_t) (pos + done));

		if (got < 0 && errno == EINTR)
		{
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		if (got < 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read file \"%s\": %m", src->path)));
		if (got == 0)
			return done;
		done += got;
	}
	return n;
}

static void
source_hash(ByteSource *src, const char *buf, size_t n)
{
	if (pg_cryptohash_update(src->hash, (const uint8 *) buf, n) < 0)
		elog(ERROR, "could not update SHA-256 checksum");
	src->hashed += n;
}

/* Extend the checksum to cover [0, upto), reading any gap. */
static void
source_hash_upto(ByteSource *src, int64 upto)
{
	upto = Min(upto, src->size);
	while (src->hashed < upto)
	{
		size_t		n = ingest_source_pread(src, src->hashed, src->scratch,
											Min((int64) SOURCE_CHUNK, upto - src->hashed));

		if (n == 0)
			break;
		source_hash(src, src->scratch, n);
		CHECK_FOR_INTERRUPTS();
	}
}

/* CaChunkProducer: the next chunk for COPY, hashing bytes seen first */
bool
ingest_source_produce(void *arg, StringInfo out)
{
	ByteSource *src = arg;
	size_t		n;

	enlargeStringInfo(out, SOURCE_CHUNK);
	n = ingest_source_pread(src, src->pos, out->data + out->len, SOURCE_CHUNK);
	if (n > 0)
	{
		/* bytes before pos that were skipped by a restart get hashed first */
		source_hash_upto(src, src->pos);
		if (src->hashed == src->pos)
			source_hash(src, out->data + out->len, n);
		else if (src->hashed < src->pos + (int64) n)
			source_hash(src, out->data + out->len + (src->hashed - src->pos),
						src->pos + n - src->hashed);
		out->len += n;
		out->data[out->len] = '\0';
		src->pos += n;
	}
	else if (src->pos < src->size)
	{
		/* else COPY would wait forever for the bytes fstat() promised */
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("file \"%s\" shrank while it was being read", src->path),
				 errdetail("It had " INT64_FORMAT " bytes when it was opened; reading stopped at byte " INT64_FORMAT ".",
						   src->size, src->pos),
				 errhint("Write files into the landing directory under another name and rename them when complete.")));
	}
	return src->pos < src->size;
}

char *
ingest_source_checksum(ByteSource *src)
{
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);

	source_hash_upto(src, src->size);
	if (pg_cryptohash_final(src->hash, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not finish SHA-256 checksum");
	/* it belongs to the file's subtransaction: free it before that ends */
	pg_cryptohash_free(src->hash);
	src->hash = NULL;
	hex_encode((const char *) digest, sizeof(digest), hex);
	hex[PG_SHA256_DIGEST_LENGTH * 2] = '\0';
	return hex;
}
