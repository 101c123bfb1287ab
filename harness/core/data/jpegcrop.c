/* mimbench: decode one box of a JPEG, not the whole image (libjpeg-turbo's partial decode).
 *
 * Built on first use by harness/core/data/jpegcrop.py (cc -O2 -shared -fPIC ... -ljpeg) and
 * called through ctypes. The rows above the box are skipped (jpeg_skip_scanlines: entropy
 * decoded, no IDCT, upsampling or colour conversion), the columns outside the iMCU-aligned
 * column range holding the box are not reconstructed (jpeg_crop_scanline), and decoding stops
 * after the box's last row (the rest of the file is not read). The Python side asks for one
 * column more on each side than the box: libjpeg-turbo's fancy (triangle) chroma upsampling
 * treats the cropped range's edge as the image's edge, so the box's outermost columns match a
 * full decode only when the range extends past them.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 1005000
#error "libjpeg-turbo >= 1.5 is required (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

#define MIM_MSG 200

struct mim_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int eof;  /* the data ended before the rows we read: a truncated file */
  char msg[JMSG_LENGTH_MAX];
};

static void mim_error_exit(j_common_ptr cinfo) {
  struct mim_error *err = (struct mim_error *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->msg);
  longjmp(err->jump, 1);
}

static void mim_emit_message(j_common_ptr cinfo, int level) {
  /* level -1: a warning (corrupt data the decoder recovers from); keep only the end-of-data one */
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF)
    ((struct mim_error *)cinfo->err)->eof = 1;
}

int mim_jpegcrop_version(void) { return LIBJPEG_TURBO_VERSION_NUMBER; }

/* Decode rows [top, top + height) of the columns [left, left + width) (widened by libjpeg to
 * the iMCU grid) as RGB, row after row into out (capacity out_cap bytes, row stride
 * *out_width * 3). On return *out_left and *out_width give the decoded column range.
 * Returns 0, or -1 (a libjpeg error or a truncated file, message in msg) or -2 (out too small). */
int mim_jpegcrop_decode(const unsigned char *data, unsigned long size, int top, int left,
                        int height, int width, unsigned char *out, long out_cap, int *out_left,
                        int *out_width, char *msg) {
  struct jpeg_decompress_struct cinfo;
  struct mim_error err;
  JDIMENSION xoff, xwidth;
  int row;

  memset(&err, 0, sizeof err);
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = mim_error_exit;
  err.pub.emit_message = mim_emit_message;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    snprintf(msg, MIM_MSG, "%s", err.msg);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  if (top < 0 || left < 0 || height < 1 || width < 1 ||
      (JDIMENSION)(top + height) > cinfo.output_height ||
      (JDIMENSION)(left + width) > cinfo.output_width) {
    jpeg_destroy_decompress(&cinfo);
    snprintf(msg, MIM_MSG, "box outside the %ux%u image", cinfo.output_width,
             cinfo.output_height);
    return -1;
  }
  xoff = (JDIMENSION)left;
  xwidth = (JDIMENSION)width;
  jpeg_crop_scanline(&cinfo, &xoff, &xwidth);
  *out_left = (int)xoff;
  *out_width = (int)xwidth;
  if ((long)xwidth * 3 * height > out_cap) {
    jpeg_destroy_decompress(&cinfo);
    snprintf(msg, MIM_MSG, "output buffer too small");
    return -2;
  }
  if (top > 0)
    jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  for (row = 0; row < height;) {
    JSAMPROW dest = out + (long)row * xwidth * 3;
    JDIMENSION got = jpeg_read_scanlines(&cinfo, &dest, 1);
    if (got == 0) { /* cannot happen with a memory source; never loop on it */
      jpeg_destroy_decompress(&cinfo);
      snprintf(msg, MIM_MSG, "the decoder returned no row");
      return -1;
    }
    row += (int)got;
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (err.eof) {
    snprintf(msg, MIM_MSG, "premature end of JPEG data");
    return -1;
  }
  return 0;
}
